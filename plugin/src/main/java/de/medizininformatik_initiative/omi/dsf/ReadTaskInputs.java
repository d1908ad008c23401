package de.medizininformatik_initiative.omi.dsf;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.hl7.fhir.r4.model.Task;
import org.hl7.fhir.r4.model.Task.ParameterComponent;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.activity.AbstractServiceDelegate;
import dev.dsf.bpe.v1.variables.Variables;

/** Copies the inputs of the Task that started or continued the process into process variables. */
public class ReadTaskInputs extends AbstractServiceDelegate
{
	public ReadTaskInputs(ProcessPluginApi api)
	{
		super(api);
	}

	@Override
	protected void doExecute(DelegateExecution execution, Variables variables)
	{
		String system = PluginIndex.get().getCodeSystem();
		Task task = variables.getLatestTask();
		for (ParameterComponent input : task.getInput())
		{
			String code = Values.codeIn(input.getType(), system);
			if (code != null && input.hasValue())
				Values.setVariable(variables, code, input.getValue());
		}
	}
}
