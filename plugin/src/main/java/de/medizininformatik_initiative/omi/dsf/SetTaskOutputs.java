package de.medizininformatik_initiative.omi.dsf;

import java.util.List;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.camunda.bpm.engine.impl.el.FixedValue;
import org.hl7.fhir.r4.model.CodeableConcept;
import org.hl7.fhir.r4.model.StringType;
import org.hl7.fhir.r4.model.Task;
import org.hl7.fhir.r4.model.Task.TaskOutputComponent;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.activity.AbstractServiceDelegate;
import dev.dsf.bpe.v1.constants.CodeSystems.BpmnMessage;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Writes the listed variables as outputs of the start Task. With {@code failed=true} it also ends the
 * start Task as failed with the DSF error output: the fixed {@code errorMessage}, else the variable
 * {@code error} that a step answered. On success the DSF's end listener marks the Task completed.
 */
public class SetTaskOutputs extends AbstractServiceDelegate
{
	private List<String> outputs = List.of();
	private boolean failed;
	private String errorMessage;

	public SetTaskOutputs(ProcessPluginApi api)
	{
		super(api);
	}

	public void setOutputs(FixedValue value)
	{
		outputs = PluginIndex.list(value.getExpressionText());
	}

	public void setFailed(FixedValue value)
	{
		failed = Boolean.parseBoolean(value.getExpressionText());
	}

	public void setErrorMessage(FixedValue value)
	{
		errorMessage = value.getExpressionText();
	}

	@Override
	protected void doExecute(DelegateExecution execution, Variables variables)
	{
		String system = PluginIndex.get().getCodeSystem();
		Task start = variables.getStartTask();
		for (String code : outputs)
		{
			Object value = variables.getVariable(code);
			if (value != null)
				start.addOutput(new TaskOutputComponent(Values.code(system, code), Values.toFhir(value)));
		}

		if (failed)
		{
			Object stepError = variables.getVariable("error");
			String message = errorMessage != null ? errorMessage : stepError != null ? stepError.toString() : "failed";
			start.setStatus(Task.TaskStatus.FAILED);
			start.addOutput(new TaskOutputComponent(new CodeableConcept(BpmnMessage.error()), new StringType(message)));
			// the DSF end listener only updates Tasks still in progress, so a failed one is written here
			api.getFhirWebserviceClientProvider().getLocalWebserviceClient().withMinimalReturn().update(start);
		}
		variables.updateTask(start);
	}
}
