package de.medizininformatik_initiative.omi.dsf;

import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.beans.factory.config.ConfigurableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Scope;

import dev.dsf.bpe.v1.ProcessPluginApi;

/** The glue's beans; the DSF requires every class named in a BPMN model to be a prototype bean. */
@Configuration
public class OmiConfig
{
	@Autowired
	private ProcessPluginApi api;

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public ReadTaskInputs readTaskInputs()
	{
		return new ReadTaskInputs(api);
	}

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public WorkItemListener workItemListener()
	{
		return new WorkItemListener(api);
	}

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public WorkItemWithdrawn workItemWithdrawn()
	{
		return new WorkItemWithdrawn(api);
	}

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public WorkItemAnswers workItemAnswers()
	{
		return new WorkItemAnswers(api);
	}

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public SendTaskMessage sendTaskMessage()
	{
		return new SendTaskMessage(api);
	}

	@Bean
	@Scope(ConfigurableBeanFactory.SCOPE_PROTOTYPE)
	public SetTaskOutputs setTaskOutputs()
	{
		return new SetTaskOutputs(api);
	}
}
